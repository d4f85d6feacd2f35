"""Sharing an adapted model: adapter files (`export` / `import`), `merge` into plain weights, nnU-Net model folders, and what each method costs."""
