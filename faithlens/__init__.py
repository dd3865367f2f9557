"""faithlens: which tokens of a model's reasoning actually matter.

The core library: model loading, generation, streaming attention metrics (FAI, WAAD, flags) and
AtMan saliency. It knows nothing about HTTP or queues; `service`, `training` and `workers` build on it.
"""

from faithlens.analysis import analyze
from faithlens.model import LoadedModel, load_model
from faithlens.params import AnalysisParams

__all__ = ["AnalysisParams", "LoadedModel", "analyze", "load_model"]
__version__ = "0.1.0"
