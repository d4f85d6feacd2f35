"""What changes in nnU-Net's training for K support scans: the schedule, the settings check, the zero-shot anchor, transductive inference, partial labels, the feature cache and the GPU data path."""
