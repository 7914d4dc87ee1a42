"""The offline quickstart's base model: a tiny Llama pretrained here on the bundled legal primer.

build_quickstart_base(out, corpus, spec) -> Path   builder.py (`qlora-pipe build-quickstart-model`)
"""

from qlora_pipe.lazy import lazy_api

__getattr__ = lazy_api(__name__, {"build_quickstart_base": "builder", "BaseSpec": "builder"})
__all__ = ["BaseSpec", "build_quickstart_base"]
