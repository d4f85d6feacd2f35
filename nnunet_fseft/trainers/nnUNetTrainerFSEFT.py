"""Base trainer: few-shot fine-tuning of a foundation model through nnU-Net's own training.

A method subclass sets only its name (`tuner`), the parameter groups it trains (`trainable`) and
its hyper-parameters as class attributes. Adapters are injected when the network is built
(`build_network_architecture`, a classmethod the predictor calls too), before DDP / torch.compile
wrap it. The foundation is the one `adopt` recorded in the plans, loaded at the end of
`initialize()`, or nnU-Net's `-pretrained_weights F` (which wins), loaded by nnU-Net into the plain
network, the adapters injected in `on_train_start`; `--c` / `--val` load our own checkpoint only
(docs/design.md, "Where the foundation comes from").
"""
import math
import os
from typing import Optional

import numpy as np
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.helpers import dummy_context

from nnunet_fseft.environment import (FINAL_VALIDATION, cpu_threads, epochs_overridden, final_validation_enabled,
                                      gpu_data_enabled)
from nnunet_fseft.errors import InputError
from nnunet_fseft.foundation.record import (architecture_trainer, load_foundation, pretrained_weights_argument,
                                            read_checkpoint, recorded_foundation, unwrap)
from nnunet_fseft.network.anatomy import anatomy
from nnunet_fseft.network.grouped_head import group_seg_layers, recorded_head_rows, width
from nnunet_fseft.network.head_init import label_crops, pretrained_head, start_head, ungrouped_on_pretrained_route
from nnunet_fseft.network.parameters import count_parameters, freeze
from nnunet_fseft.training.anchor import ANCHOR_FILE, AnchoredLoss, anchor_for_training
from nnunet_fseft.training.gpu_data.loader import device_dataloaders
from nnunet_fseft.training.partial_labels import PartialLabelTraining
from nnunet_fseft.training.schedule import (WarmupCosine, adamw_poly, describe_schedule, diverged, few_shot_schedule,
                                            plateaued, set_schedule)
from nnunet_fseft.training.settings import check_settings
from nnunet_fseft.tuners.registry import apply_tuner


class _Plateau(Exception):
    """The train loss stopped improving (nnU-Net's loop has no way out but its last epoch)."""


class nnUNetTrainerFSEFT(PartialLabelTraining, nnUNetTrainer):
    # PartialLabelTraining: a target whose dataset.json names an annotations file (scans that label only some
    # classes) trains with the partial-label loss; the zero-shot anchor then holds the classes a scan leaves out
    tuner = None  # method name in nnunet_fseft.tuners.registry.TUNERS; None adds no adapters
    trainable = ("all",)  # parameter groups it trains (nnunet_fseft.network.parameters.parameter_groups)

    # Few-shot schedule (nnunet_fseft/training/schedule.py, FSEFT's rule): at most `max_passes` passes over the
    # K support scans, `patches_per_scan` patches per scan and pass; linear warm-up over `warmup_passes`,
    # then cosine decay; an early stop once the train loss's moving average over `plateau_window` passes
    # gains less than `plateau_delta` in `plateau_patience` passes. The final checkpoint is the model:
    # nothing is chosen on the validation cases, which are the test set of a K-shot split.
    # `epochs` (None: from K) / nnUNet_fseft_epochs and nnUNet_fseft_iters_per_epoch override the length.
    max_passes = 200
    patches_per_scan = 6
    warmup_passes = 1
    plateau_window = 10
    plateau_patience = 20
    plateau_delta = 1e-3
    epochs = None
    iterations_per_epoch = 25
    val_iterations_per_epoch = 10
    learning_rate = 1e-3
    weight_decay_fseft = 0.0  # FSEFT's: none
    # False: the network starts from nnU-Net's random initialisation instead of the foundation (the
    # benchmark's target-only baseline, nnunet_fseft/trainers/start.py); the plans' architecture all the same.
    from_foundation = True
    # Zero-shot start: target labels the foundation knows (by name) start from its head rows.
    head_init = True
    # The foundation's classes the target lacks are grouped with background (nnunet_fseft/network/grouped_head.py), so
    # that step 0 predicts exactly the zero-shot segmentation; False: a plain head (mergeable).
    group_unmatched = True
    # Zero-shot anchor (nnunet_fseft/training/anchor.py): for the labels the foundation knows, the start's (zero-shot)
    # segmentation of each patch is one more annotation, weighted anchor_weight / K; 0 trains without it.
    anchor_weight = 1.0
    # Support set, patch sampling and augmentation on the training device (nnunet_fseft/training/gpu_data/loader.py);
    # nnUNet_fseft_gpu_data=1 / 0 overrides.
    gpu_data = False

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        check_settings(type(self))  # before nnU-Net's set-up: a misspelt hyper-parameter stops here
        super().__init__(plans, configuration, fold, dataset_json, device)
        if self.device.type == "cpu" and cpu_threads():  # after nnUNetv2_train gave torch every core
            torch.set_num_threads(cpu_threads())
        # the length until on_train_start knows K (plan_schedule)
        set_schedule(self, self.epochs or self.max_passes, self.iterations_per_epoch, self.val_iterations_per_epoch)
        self.schedule = None
        self._step_in_epoch = 0
        self.initial_lr = self.learning_rate
        self.gpu_data = gpu_data_enabled(self.gpu_data)  # a bad nnUNet_fseft_gpu_data stops here, not later
        self.final_validation = final_validation_enabled()  # and a bad nnUNet_fseft_final_validation
        self.weight_decay = self.weight_decay_fseft
        self.foundation = recorded_foundation(self.plans_manager.plans)
        self._restoring = False  # set by load_checkpoint: weights come from our checkpoint
        self._inject_on_train_start = False
        self._before_pretrained = None
        # output channels that start from the foundation's rows (initialise_head): label values, or a
        # sigmoid head's region channels
        self.known_labels = []
        self.anchor = None
        if self.foundation is not None and self.foundation["configuration"] != configuration:
            raise InputError(f"The foundation in these plans was adopted for configuration "
                             f"'{self.foundation['configuration']}', not '{configuration}'; train that "
                             f"configuration or adopt the foundation again.")

    @classmethod
    def adapt(cls, network: torch.nn.Module) -> torch.nn.Module:
        """Injects the method's adapters and applies the freezing rule, in place."""
        if cls.tuner is not None:
            apply_tuner(network, cls.tuner, cls)
        freeze(network, cls.trainable)
        return network

    @classmethod
    def build_network_architecture(cls, plans_manager, configuration_manager, num_input_channels,
                                   num_output_channels, enable_deep_supervision: bool = True):
        # A classmethod, so that nnUNetPredictor (which calls it on the class) rebuilds
        # exactly the adapted network that was trained.
        plain = architecture_trainer(plans_manager.plans)
        groups = cls.grouped_head_rows(plans_manager.plans, num_output_channels)
        network = plain.build_network_architecture(
            plans_manager, configuration_manager, num_input_channels,
            width(groups) if groups else num_output_channels, enable_deep_supervision)
        if groups and anatomy(network).decoder_is_head:  # Primus: its decoder is the head, new for every target
            network = plain.build_network_architecture(
                plans_manager, configuration_manager, num_input_channels, num_output_channels,
                enable_deep_supervision)
        elif groups:
            group_seg_layers(network, groups)
        return cls.adapt(network)

    @classmethod
    def grouped_head_rows(cls, plans: dict, num_output_channels: int):
        """The grouped head's rows per target channel that adopt recorded (None: a plain head)."""
        return recorded_head_rows(plans, num_output_channels) if cls.group_unmatched else None

    @classmethod
    def pretrained_weights_follow(cls) -> bool:
        return pretrained_weights_argument() is not None

    def initialize(self):
        if not self.from_foundation:
            if self.pretrained_weights_follow():  # nnU-Net would load them right after initialize()
                raise InputError(f"{type(self).__name__} trains from random weights and cannot take "
                                 f"-pretrained_weights; drop it (or train a method that starts from them).")
            super().initialize()
            self.print_to_log_file(f"{type(self).__name__}: nnU-Net's random initialisation, no foundation weights")
            return
        if (self.foundation is None or self.pretrained_weights_follow()) and not self._restoring:
            if self.is_ddp:
                raise InputError("Multi-GPU training needs the foundation recorded by `nnunet-fseft adopt` "
                                 "(adapters must be in place before DDP wraps the network); adopt the "
                                 "foundation instead of passing -pretrained_weights.")
            # nnU-Net loads -pretrained_weights into this network next; it must not hold adapters yet.
            self._inject_on_train_start = True
            self.build_network_architecture = architecture_trainer(self.plans_manager.plans).build_network_architecture
        super().initialize()
        if self._inject_on_train_start:
            self._before_pretrained = next(unwrap(self.network).parameters()).detach().clone()
        elif not self._restoring:
            foundation_heads = self.start_from_foundation(unwrap(self.network))
            self.print_to_log_file(f"Loaded foundation {self.foundation['checkpoint']}")
            if self.head_init:
                self.initialise_head(unwrap(self.network), foundation_heads)

    def start_from_foundation(self, network: torch.nn.Module) -> list:
        """Loads the recorded foundation into the network; returns its head tensors as
        (weight, bias) per new head, or [] where the new head cannot start from them."""
        weights = load_foundation(network, self.foundation)
        a = anatomy(network)
        if a.decoder_is_head:  # Primus's decoder is sized by the number of classes: nothing to copy
            return []
        return [(weights[f"{h}.weight"], weights.get(f"{h}.bias")) for h in a.head]

    def start_head_from_pretrained_weights(self, network: torch.nn.Module) -> None:
        """On nnU-Net's own transfer route nnU-Net loads everything but the head; the head starts as
        on the adopt route, from the rows of the checkpoint's labels (its dataset.json is in it)."""
        heads, labels = pretrained_head(network, read_checkpoint(pretrained_weights_argument()))
        if not heads:
            self.print_to_log_file("head initialisation: the -pretrained_weights checkpoint records no labels or "
                                   "no head of this network (new head)")
            return
        self.initialise_head(network, heads, labels)
        ungrouped = ungrouped_on_pretrained_route(self.dataset_json["labels"], labels)
        if ungrouped:
            self.print_to_log_file(ungrouped)

    def new_heads(self, network: torch.nn.Module) -> list:
        return [network.get_submodule(h) for h in anatomy(network).head]

    def initialise_head(self, network: torch.nn.Module, foundation_heads: list,
                        foundation_labels: Optional[dict] = None) -> None:
        """The new head(s) from the foundation's rows for the labels it knows (by name; its labels are
        the recorded foundation's unless given), imprinted from the support set for the others."""
        if not foundation_heads:
            self.print_to_log_file("head initialisation: not available for this architecture (new head)")
            return
        self.known_labels = start_head(
            network, self.new_heads(network), foundation_heads, self.dataset_json["labels"],
            foundation_labels if foundation_labels is not None else self.foundation.get("labels", {}),
            self.support_patches, self.print_to_log_file, None if self.tunes_decoder else type(self).__name__)

    @property
    def tunes_decoder(self) -> bool:
        return "decoder" in self.trainable or "all" in self.trainable

    def support_patches(self) -> list:
        """Patches of the support scans, one centred on each label (what `imprint` learns the new rows from)."""
        keys = self.do_split()[0]
        dataset = self.dataset_class(self.preprocessed_dataset_folder, keys)
        patches = []
        for k in keys:
            data, seg = dataset.load_case(k)[:2]
            patches += label_crops(np.asarray(data[:]), np.asarray(seg[:]), self.configuration_manager.patch_size)
        return patches

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        # Mirror as the foundation did: nnU-Net's mirroring augmentation and test-time mirroring assume a
        # network trained mirror-invariant, and one trained without mirroring knows left from right (its
        # spleen is on one side), so mirrored patches would teach it a mirrored anatomy and mirrored
        # test-time predictions would cancel its own. Plans adopted before the axes were recorded keep
        # nnU-Net's default.
        rotation, dummy_2d, initial_patch_size, mirror_axes = super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        if self.foundation is not None and "mirror_axes" in self.foundation:
            axes = self.foundation["mirror_axes"]
            mirror_axes = None if axes is None else tuple(a for a in axes if a < len(self.configuration_manager.patch_size))
            self.inference_allowed_mirroring_axes = mirror_axes
        return rotation, dummy_2d, initial_patch_size, mirror_axes

    def _build_loss(self):
        # Primus has one output and no `decoder` to switch deep supervision on or off
        if not hasattr(unwrap(self.network), "decoder"):
            self.enable_deep_supervision = False
        return super()._build_loss()

    def set_deep_supervision_enabled(self, enabled: bool):
        if hasattr(unwrap(self.network), "decoder"):
            super().set_deep_supervision_enabled(enabled)

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        self._restoring = True
        super().load_checkpoint(filename_or_checkpoint)

    def configure_optimizers(self):
        # nnU-Net builds the optimizer in initialize(); the scheduler is replaced in on_train_start,
        # once the split says how many support scans there are
        return adamw_poly(self)

    def plan_schedule(self) -> None:
        """The schedule for this fold's K support scans (nnunet_fseft/training/schedule.py)."""
        k = len(self.do_split()[0])
        fixed = epochs_overridden() or self.epochs is not None
        self.schedule = few_shot_schedule(
            k, self.configuration_manager.batch_size, self.num_iterations_per_epoch,
            max_passes=self.max_passes, patches_per_scan=self.patches_per_scan, warmup_passes=self.warmup_passes,
            plateau_window=self.plateau_window, plateau_patience=self.plateau_patience,
            epochs=self.num_epochs if fixed else None)
        self.num_epochs = self.schedule.epochs
        self.print_to_log_file(describe_schedule(self.schedule, k, self.plateau_delta))

    def train_step(self, batch: dict) -> dict:
        if self.schedule is not None:  # the learning rate moves per step, not per epoch
            self.lr_scheduler.at_step(self.current_epoch * self.num_iterations_per_epoch + self._step_in_epoch)
            self._step_in_epoch += 1
        if self.anchor is not None:  # the step-0 prediction of this batch, for the loss's penalty
            data = batch["data"].to(self.device, non_blocking=True)
            with torch.autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context():
                self.anchor.predict_start(self.network, data)
            batch = {**batch, "data": data}
        return super().train_step(batch)

    def _annotated(self, keys):
        mask = super()._annotated(keys)
        if self.anchor is not None:
            self.anchor.annotated = mask
        return mask

    @property
    def anchor_file(self) -> str:
        # kept after training: `--c` with more epochs continues a finished training too
        return os.path.join(self.output_folder, ANCHOR_FILE)

    def start_anchor(self) -> None:
        """The zero-shot anchor (nnunet_fseft/training/anchor.py) from this training's start, or from
        the file that start wrote on --c; where it is off the log says why."""
        if self.current_epoch >= self.num_epochs:
            return
        self.anchor, message = anchor_for_training(self) if self.anchor_weight else (None, "anchor_weight is 0")
        if self.anchor is None and self.foundation is not None and self.foundation.get("extends"):
            # an extending target's scans annotate only its new labels: nothing else would hold the foundation's
            raise InputError(f"{type(self).__name__} would lose the foundation's classes: this target extends its "
                             f"foundation, whose classes only the zero-shot anchor holds, and it is off here "
                             f"({message.split(', ', 1)[-1]}); train a method that starts from the foundation's head "
                             f"with anchor_weight > 0, such as nnUNetTrainerFSEFT_DecoderFT.")
        if self.anchor is not None:
            self.loss = AnchoredLoss(self.loss, self.anchor)
            self.print_to_log_file(message)
        elif self.anchor_weight:
            self.print_to_log_file(message)

    def on_train_epoch_start(self):
        self._step_in_epoch = 0
        super().on_train_epoch_start()

    def get_dataloaders(self):
        return device_dataloaders(self) if self.gpu_data else super().get_dataloaders()

    def on_train_start(self):
        if not self.was_initialized:
            self.initialize()
        if self._inject_on_train_start:
            network = unwrap(self.network)
            if torch.equal(next(network.parameters()).detach(), self._before_pretrained):
                raise InputError("No foundation weights were loaded, as these plans record none and no "
                                 "-pretrained_weights was given; run `nnunet-fseft adopt` for this dataset and train "
                                 "with the plans it writes (-p FSEFTPlans), or pass -pretrained_weights.")
            self.adapt(network)
            if self.head_init:
                self.start_head_from_pretrained_weights(network)
            self.optimizer, self.lr_scheduler = self.configure_optimizers()
            self._inject_on_train_start = False
        self.plan_schedule()
        self.lr_scheduler = WarmupCosine(self.optimizer, self.initial_lr, self.schedule)
        if self.current_epoch and self.has_plateaued():  # --c after an early stop: nothing left to train
            self.num_epochs = self.current_epoch
        self.start_anchor()
        trainable, total = count_parameters(unwrap(self.network))
        self.print_to_log_file(f"{self.__class__.__name__}: training {trainable:,} of {total:,} parameters "
                               f"({100 * trainable / total:.2f}%)")
        super().on_train_start()
        # No checkpoint_best.pth: nnU-Net saves one whenever the validation cases' pseudo-Dice beats
        # this, and in a K-shot split those cases are the test set.
        self._best_ema = math.inf
        if self.device.type == "cuda":  # after nnU-Net's set-up, so the peak below is training's own
            torch.cuda.reset_peak_memory_stats(self.device)

    def on_train_epoch_end(self, train_outputs):
        super().on_train_epoch_end(train_outputs)
        # this epoch's mean over every DDP rank, so every rank takes the same branch below
        loss = self.logger.get_value("train_losses", step=self.current_epoch)
        if not np.isfinite(loss) and diverged(self.network, train_outputs, self.is_ddp):
            message = (f"Training stopped at epoch {self.current_epoch}: the train loss is {loss}, as a foundation "
                       f"with non-finite weights or a learning rate too high for this method ({self.initial_lr:g}) "
                       f"gives; check the foundation's checkpoint, or set a lower `learning_rate` in a subclass "
                       f"of {type(self).__name__}.")
            self.print_to_log_file(message)
            raise InputError(message)

    def on_epoch_end(self):
        super().on_epoch_end()
        s = self.schedule
        if s is not None and self.current_epoch < self.num_epochs and self.has_plateaued():
            self.print_to_log_file(f"Early stop after epoch {self.current_epoch - 1}: the train loss's {s.window}-epoch "
                                   f"moving average gained less than {self.plateau_delta:g} in {s.patience} epochs")
            raise _Plateau()

    def has_plateaued(self) -> bool:
        s = self.schedule
        losses = self.logger.get_value("train_losses", step=None)  # every rank's mean: ranks agree
        return plateaued(losses, s.window, s.patience, self.plateau_delta)

    def perform_actual_validation(self, save_probabilities: bool = False):
        if not self.final_validation:
            self.print_to_log_file(f"validation after training skipped ({FINAL_VALIDATION}=0)")
            return
        super().perform_actual_validation(save_probabilities)

    def run_training(self):
        try:
            super().run_training()
        except _Plateau:  # raised at an epoch's end: the loop's next step is the end of training
            self.on_train_end()

    def on_train_end(self):
        if self.device.type == "cuda":  # read by `nnunet-fseft benchmark`
            self.print_to_log_file(f"peak GPU memory {torch.cuda.max_memory_allocated(self.device) / 2 ** 20:.0f} MiB")
        super().on_train_end()
