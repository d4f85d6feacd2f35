"""The benchmark's two reference rows: the start every method trains from, without training it
(step 0), and the target alone, trained from scratch (no foundation)."""
from nnunet_fseft.trainers.nnUNetTrainerFSEFT import nnUNetTrainerFSEFT


class nnUNetTrainerFSEFT_Start(nnUNetTrainerFSEFT):
    """No optimiser step: the adopted foundation with its new head as head initialisation sets it
    (the foundation's classes grouped into the target's labels, so that it predicts what zeroshot
    predicts; imprinting from the support set for labels the foundation does not know), saved as
    checkpoint_final.pth and validated like any method. Every method starts from this network (its
    adapters start as the identity; tests/test_methods.py), so its Dice is each method's at step 0."""
    trainable = ("head",)

    def run_training(self):
        self.on_train_start()
        self.print_to_log_file("nnUNetTrainerFSEFT_Start: no training; the final checkpoint is the start")
        self.on_train_end()


class nnUNetTrainerFSEFT_TargetOnly(nnUNetTrainerFSEFT):
    """Training on the target alone (PEFT-MedNeXt's "trained on the small set" baseline): the
    foundation's plans and architecture from nnU-Net's random initialisation, every parameter
    trained on the same K support scans with the same few-shot schedule as every method, so what it
    reaches is what those scans teach without pre-training. nnUNetTrainerFSEFT_Pretrain's AdamW
    rate, which trains the demo's foundation from scratch (FullFT's 1e-3 is for weights that
    already segment)."""
    from_foundation = False
    head_init = False
    anchor_weight = 0.0  # nothing to hold: there is no start worth keeping
    group_unmatched = False  # a plain head of the target's labels
    learning_rate = 3e-3
