"""Files shipped with the package: the tokenizer, the pretrained checkpoint and its model card."""
from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent
TOKENIZER_FILE = "tokenizer.json"
PRETRAINED_FILE = "slm360-nano.safetensors"


def tokenizer_path() -> Path:
    """Path of the shipped WordPiece tokenizer."""
    return ASSETS_DIR / TOKENIZER_FILE


def pretrained_checkpoint_path() -> Path:
    """Path of the shipped pretrained checkpoint; a clear error if this install lacks it."""
    path = ASSETS_DIR / PRETRAINED_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"the pretrained SLM360 Nano checkpoint is missing: {path}. "
            "Reinstall slm360-rasa, or produce one with `slm360 pretrain` and copy it there."
        )
    return path
