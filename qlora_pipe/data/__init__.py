"""The data stage: rows -> validated, templated, tokenized, masked dataset. Gets a tokenizer; never loads a model.

prepare_data(recipe.data, tokenizer, seed) -> PreparedData   prepare.py (checks, mixing, masking)
sources.py          local files and Hub datasets -> rows; formats -> conversations or text
chat_templates.py   which chat template (the tokenizer's, a bundled one, a .jinja file)
cache.py            fingerprinted cache of tokenized data
report.py           rows kept and dropped by reason, lengths, trained-token share
preview.py          `qlora-pipe data --preview`: examples as training sees them
"""

from qlora_pipe.lazy import lazy_api

__getattr__ = lazy_api(__name__, {"prepare_data": "prepare", "PreparedData": "prepared", "IGNORE": "prepared"})
__all__ = ["IGNORE", "PreparedData", "prepare_data"]
