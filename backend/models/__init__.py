"""Model sources and loading: packaged offline models, hub ids, local folders, GGUF files."""

from backend.models.loading import LoadedModel, load_model, source_fingerprint
from backend.models.sources import (DEFAULT_CAUSAL, DEFAULT_ENCODER, PACKAGED, ModelSource,
                                    resolve_source)

__all__ = ["DEFAULT_CAUSAL", "DEFAULT_ENCODER", "PACKAGED", "LoadedModel", "ModelSource",
           "load_model", "resolve_source",
           "source_fingerprint"]
