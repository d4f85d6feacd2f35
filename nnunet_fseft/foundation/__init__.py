"""The foundation: the record `adopt` writes into the target's plans, reading and checking its weights, `adopt` itself, `zeroshot`, and which target labels it knows by name."""
