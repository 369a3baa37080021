"""scprint-atlas pipeline: datasets in, a restartable scPRINT-2 atlas out (see ``scatlas --help``)."""
