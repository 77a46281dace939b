"""`pathomics view`: a local deep-zoom viewer of an output directory with tissue, patch, QC, attention and risk overlays."""

from pathomics.viewer.deepzoom import DeepZoom
from pathomics.viewer.server import ViewerServer, serve

__all__ = ["DeepZoom", "ViewerServer", "serve"]
