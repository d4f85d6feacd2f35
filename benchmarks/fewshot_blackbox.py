"""Few-shot Dice of the black-box methods against zero-shot and full fine-tuning, on a base organ.

The protocol of benchmarks/fseft_synthetic.py (`nnunet-fseft benchmark`: a small foundation on
five base organs, scanner A; one of them, default spleen, on scanner B as the target), with
the black-box methods LinearProbe, SpatialAdapter and SpatialAdapterTI against FullFT, K = 1
and 5, 3 repeats. Transductive inference takes the held-out scans, the ones it is scored on,
as its unlabelled query volumes (nnUNet_fseft_query), as the FSEFT paper does.

    python benchmarks/fewshot_blackbox.py --workdir /tmp/fsbench [--device cuda] [--organ spleen] [--schedule 3 100]

Writes the benchmark's results.csv, results.json, report.md and figures in WORKDIR/base (or
WORKDIR/base_ORGAN) and the report in WORKDIR/report.md. Each run follows its trainer's own schedule
unless --schedule fixes one.
"""
from fseft_synthetic import main, parser

METHODS = ["Start", "LinearProbe", "SpatialAdapter", "SpatialAdapterTI", "FullFT"]

if __name__ == "__main__":
    main(parser(__doc__, tasks=["base"], methods=METHODS, ks=(1, 5)).parse_args())
