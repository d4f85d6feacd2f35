"""The start every method trains from, without training it: the step-0 row of a benchmark."""
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
