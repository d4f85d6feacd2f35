"""The end-to-end tests share one nnU-Net workspace per session, where nnU-Net refuses a dataset id
that two folders share. A test that takes an id another test already uses fails only when both run in
one session (it happened: Dataset506 twice); this finds it at once, from the names written out in tests/."""
import re
from collections import defaultdict
from pathlib import Path


def test_every_dataset_id_in_the_tests_names_one_dataset():
    names = defaultdict(set)
    for path in Path(__file__).parent.glob("*.py"):
        for number, name in re.findall(r"Dataset(\d{3})_([A-Za-z0-9]+)", path.read_text()):
            names[number].add(name)
    shared = {number: sorted(n) for number, n in names.items() if len(n) > 1}
    assert not shared, f"these dataset ids name more than one dataset in tests/, give one of each a free id: {shared}"
