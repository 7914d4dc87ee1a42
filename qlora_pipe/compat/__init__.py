"""Every place qlora-pipe overrides or reaches into a library's internals, one module per library.

Each module names the versions it was verified with, why each reach is needed, when it can go, and
the test that fails first when a new version breaks it. Upgrading a library starts here (and with
``tests/test_golden.py``, which pins what training computes).

    transformers.py   Trainer: checkpoint load/save hooks, the skippable LR scheduler, default
                      callbacks, TensorBoard's log folder, the modules loaded unquantized
    trl.py            SFTTrainer's bf16 cast of QLoRA adapters; the {% generation %} template helpers
    trl_grpo.py       GRPOTrainer: each prompt rendered with its row's tools; its fused LM head for the
                      auto probe
    torch.py          the fused per-tensor norm of the bad-step check
    accelerate.py     an FSDP launch on a machine without a GPU runs accelerate's FSDP2 path (not DDP)
    bitsandbytes.py   the CPU inference fast path; quantizing one tensor as loading does
    llama_cpp.py      llama.cpp's GGUF converter (run as its own process): pre-tokenizer names for
                      tokenizers it has no hash for, GPT-2's n_ctx, the q/k row order it writes
"""
