"""`nnunet-fseft benchmark`: the FSEFT protocol (protocol.py), run through nnU-Net's commands
(runs.py), in an output folder that keeps what it did not write (output_folder.py), reported as
tables and figures (report.py)."""
