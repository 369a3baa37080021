"""An atlas directory: its layout, manifest, state (status, validate), reader and label names.

``from pipeline.atlas import open_atlas`` is the Python API for reading one.
"""

from pipeline.atlas.reader import Atlas, open_atlas
from pipeline.atlas.state import AtlasState, load_state, read_part, status_report, validate

__all__ = ["Atlas", "AtlasState", "load_state", "open_atlas", "read_part", "status_report", "validate"]
