# nnU-Net imports this file as a top-level module while it looks a trainer up by name;
# the classes stay in nnunet_fseft.trainers, so there is one copy of each.
from nnunet_fseft.trainers import *  # noqa: F401,F403
