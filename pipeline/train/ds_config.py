"""The DeepSpeed configuration of a training step, in one place: the Ray Train worker
(``pipeline.train.worker``) and the single-GPU check (``benchmarks/deepspeed_step.py``) both use it.
No imports: a bare GPU box (no ray) reads it too."""

from __future__ import annotations


def deepspeed_config(batch_size: int, zero_stage: int, gradient_clipping: float, bf16: bool) -> dict:
    """ZeRO ``zero_stage`` with the caller's torch AdamW (DeepSpeed's own optimizers JIT-compile ops),
    bf16 weights with fp32 master weights when ``bf16`` (GPUs), one micro-batch per step."""
    return {
        "train_micro_batch_size_per_gpu": batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": gradient_clipping,
        "zero_optimization": {"stage": zero_stage, "stage3_gather_16bit_weights_on_model_save": True},
        "zero_allow_untested_optimizer": True,  # torch's AdamW: DeepSpeed's own ones JIT-compile
        "bf16": {"enabled": bf16},
        "steps_per_print": 10**9,
    }
