# Folder listed in nnUNet_extTrainer (see nnunet_fseft/discovery.py).
