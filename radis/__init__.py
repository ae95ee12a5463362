"""radis: Rationale Distillation (Wu et al., Findings of ACL 2025) for translation
fine-tuning of instruction-tuned LLMs on DeepSpeed ZeRO-3."""

__version__ = "0.1.0"
