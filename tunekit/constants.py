"""Constants that several stages share, written once."""

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
# OpenAI's prices per 1M tokens (training, inference): package data, so an installed tunekit has them
PRICES_FILE = PACKAGE_DIR / "prices.yaml"
# the model OpenAI's fine-tuning seeds use, and whose tokenizer (o200k_base) counts tokens by default
DEFAULT_OPENAI_MODEL = "gpt-4o-mini-2024-07-18"
# the LoRA ranks vLLM's --max-lora-rank accepts (vLLM 0.32)
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
