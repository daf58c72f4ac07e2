"""Rasa 3.6 GraphComponents: `SLM360Featurizer` (featurizer.py) and `SLM360Classifier` (classifier.py).

Nothing is imported here on purpose: importing a component module pulls in Rasa, and
`slm360_rasa/__init__.py` resolves `slm360_rasa.SLM360Featurizer` / `SLM360Classifier`
lazily, so the engine (`slm360_rasa.nano`) stays usable without Rasa installed.
"""
