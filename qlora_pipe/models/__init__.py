"""Models: the base a run trains on, read and run.

loading.py            tokenizer, 4-bit (or 16-bit) base, LoRA; the trained model reloaded
embedding_storage.py  an fp32 load's input embedding kept in its stored 16 bits
classifier.py         the base as a sequence classifier (task: classification, method: reward)
gguf_source.py        a GGUF file as the base: converted once to a plain folder
examples.py           real pretrained models that reach this machine through PyPI
base_record.py        the base a run trained on, recorded and checked by every later stage
tokens.py             special tokens: a pad token distinct from EOS
generation.py         generation shared by chat and eval
"""
