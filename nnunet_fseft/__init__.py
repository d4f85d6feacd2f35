"""nnunet-fseft: few-shot, parameter-efficient fine-tuning of nnU-Net foundation models.

Kept free of heavy imports: `nnunet-fseft env` and the start-up hook must stay fast.
"""
__version__ = "0.1.0"
