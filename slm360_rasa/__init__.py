"""slm360-rasa: SLM360 Nano for Rasa 3.6.

In config.yml: `- name: slm360_rasa.SLM360Classifier` or `- name: slm360_rasa.SLM360Featurizer`.
The Rasa components are imported lazily, so `slm360_rasa.nano` stays usable without Rasa.
"""
__version__ = "0.1.0"

_COMPONENTS = {
    "SLM360Classifier": "slm360_rasa.components.classifier",
    "SLM360Featurizer": "slm360_rasa.components.featurizer",
}


def __getattr__(name):
    # Rasa resolves "slm360_rasa.SLM360Classifier" with getattr on this module; importing
    # the component module here registers it with Rasa's recipe only when it is needed.
    if name in _COMPONENTS:
        import importlib

        return getattr(importlib.import_module(_COMPONENTS[name]), name)
    raise AttributeError(f"module 'slm360_rasa' has no attribute {name!r}")
