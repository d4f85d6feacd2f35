"""Datasets: synthetic phantoms (`synth`), pooling (`combine`), K-shot splits (`kshot`), reading dataset.json, and writes that keep a backup of what they replace."""
