"""Running a prediction: Lightning data module, module and writer; signals; CPU settings; ``run_predict``."""
