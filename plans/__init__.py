"""Plans presets (JSON beside this file), installed as `nnunet_fseft.plans`."""
