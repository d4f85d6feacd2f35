"""Plans: the name `adopt` gives the plans it writes, reading a dataset's plans back (load.py),
and presets (presets.py, with the JSON files beside it)."""

# The plans name `nnunet-fseft adopt` writes by default and every command reads by default
# (`-p FSEFTPlans` on nnU-Net's command line).
PLANS_NAME = "FSEFTPlans"
