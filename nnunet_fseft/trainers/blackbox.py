"""Black-box methods: the foundation is queried for features, never opened, trained or backpropagated.

`nnUNetTrainerFSEFT_BlackBox` holds the mechanics; a method sets its adapter and hyper-parameters:
- `adapter`: "linear_probe" or "spatial_adapter" (nnunet_fseft.network.black_box);
- `features`: "cached" computes the support volumes' features once (nnU-Net's sliding window,
  fp16) and trains on patches drawn from them, with nnU-Net's spatial augmentation and mirroring
  applied to features and labels together (its intensity augmentations have no meaning on
  features); "online" computes them per batch from nnU-Net's augmented images;
- `feature_store`: "memory", or "disk" (memory-mapped .npy files in the fold folder, removed
  when training ends);
- `transductive`: adds the organ-size prior on unlabelled query volumes (nnunet_fseft.training.transductive).
"""
import os
from typing import Optional

import numpy as np
import torch

from nnunet_fseft.datasets.dataset_json import not_one_class_per_voxel, plain_labels
from nnunet_fseft.errors import InputError
from nnunet_fseft.foundation.record import build_foundation, recorded_foundation, unwrap
from nnunet_fseft.network.black_box import build_black_box
from nnunet_fseft.network.grouped_head import group_head, width
from nnunet_fseft.trainers.nnUNetTrainerFSEFT import nnUNetTrainerFSEFT
from nnunet_fseft.training.feature_cache import FeatureDataset, FeatureStore, cache_bytes, sliding_window_features
from nnunet_fseft.training.transductive import POOL, SizePrior, pooled, query_images, size_prior, support_volumes


def spatial_only(transforms, outside: Optional[int]):
    """nnU-Net's training pipeline without its intensity augmentations (each wrapped in a
    RandomTransform) and image masking: what is left moves features and labels together. Voxels
    outside the volume (nnU-Net's padding label -1, and what the spatial transform rotates or scales
    in from past the patch) get the label `outside` instead of background; None leaves them as is."""
    from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
    from batchgeneratorsv2.transforms.utils.random import RandomTransform
    from batchgeneratorsv2.transforms.utils.remove_label import RemoveLabelTransform
    kept = [t for t in transforms.transforms
            if not isinstance(t, RandomTransform) and type(t).__name__ != "MaskImageTransform"]
    if outside is not None:
        for t in kept:
            if isinstance(t, SpatialTransform):
                t.border_mode_seg, t.padding_value_seg = "constant", -1
            elif isinstance(t, RemoveLabelTransform) and t.label_value == -1:
                t.set_to = outside
        kept = [t for t in kept if not (isinstance(t, RemoveLabelTransform) and t.label_value == t.set_to)]
    transforms.transforms = kept
    return transforms


def _megabytes(n: int) -> str:
    return f"{n / 2 ** 20:.1f} MB"


class nnUNetTrainerFSEFT_BlackBox(nnUNetTrainerFSEFT):
    adapter = None
    trainable = ("all",)  # everything the black-box network holds is the adapter
    features = "cached"
    feature_store = "memory"
    transductive = False
    size_margin = 0.3   # g: the hinge is zero while |S - S_hat| / max(S, S_hat) <= g
    size_weight = 0.1   # weight of the hinge in its extra optimiser step
    learning_rate = 1e-2

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        if self.features not in ("cached", "online") or self.feature_store not in ("memory", "disk"):
            raise InputError(f"{self.__class__.__name__} has features = '{self.features}' and feature_store = "
                             f"'{self.feature_store}'; set features to 'cached' or 'online' and feature_store to "
                             f"'memory' or 'disk'.")
        if self.gpu_data and self.features == "cached":
            if type(self).gpu_data:  # the class's own settings contradict each other
                raise InputError(f"{self.__class__.__name__} sets gpu_data = True but trains on cached features, not "
                                 f"images, so the GPU data path does not apply; set gpu_data = False, or features = "
                                 f"'online' (e.g. nnUNetTrainerFSEFT_SpatialAdapterOnline).")
            # nnUNet_fseft_gpu_data=1 is one switch for a whole session (a benchmark of every method, say):
            # features cached once need no augmentation workers to keep up, so this method keeps its own path
            self.gpu_data = False
            self.print_to_log_file(f"nnUNet_fseft_gpu_data=1 does not apply to {self.__class__.__name__}, which trains "
                                   f"on cached features: their patches are cut and augmented on the CPU")
        if self.transductive and self.annotations is not None:
            raise InputError(f"{self.__class__.__name__}: size priors need every class labelled in every support "
                             f"scan, and this dataset's annotations file says some scans leave classes out; use "
                             f"{self.__class__.__name__[:-2]} instead.")
        self.store = self.query_store = self.size_prior = None
        self.query_files = []

    @classmethod
    def build_network_architecture(cls, plans_manager, configuration_manager, num_input_channels,
                                   num_output_channels, enable_deep_supervision: bool = True):
        # The predictor calls this too: the foundation is read from the file the plans record
        # (its sha256 checked), the adapter's weights then come from the checkpoint.
        record = recorded_foundation(plans_manager.plans)
        if record is None:
            raise InputError(f"{cls.__name__} queries the foundation recorded by `nnunet-fseft adopt`, and these "
                             f"plans record none; adopt the foundation for this dataset and train with its plans "
                             f"(-p FSEFTPlans).")
        network, _ = build_foundation(plans_manager, configuration_manager, num_input_channels, record)
        groups = cls.grouped_head_rows(plans_manager.plans, num_output_channels)
        black_box = build_black_box(network, cls.adapter, width(groups) if groups else num_output_channels,
                                    record["sha256"])
        if groups:
            black_box.adapter.head = group_head(black_box.adapter.head, groups)
        return black_box

    def initialize(self):
        if self.pretrained_weights_follow():
            raise InputError(f"{self.__class__.__name__} queries the foundation recorded by `nnunet-fseft adopt` "
                             f"and cannot take -pretrained_weights; drop -pretrained_weights and train with the "
                             f"plans adopt wrote.")
        if self.foundation is None:
            raise InputError(f"{self.__class__.__name__} queries the foundation recorded by `nnunet-fseft adopt`, "
                             f"and plans {self.plans_manager.plans_name} record none; adopt the foundation for this "
                             f"dataset and train with its plans (-p FSEFTPlans).")
        if self.transductive and not_one_class_per_voxel(self.label_manager):
            # regions: no one label per voxel; ignore label: sparse support labels would make the prior too small
            raise InputError(f"{self.__class__.__name__}: size priors need dense labels with one class per voxel, "
                             f"and this dataset uses {not_one_class_per_voxel(self.label_manager)}; "
                             f"use {self.__class__.__name__[:-2]} instead.")
        super().initialize()

    tunes_decoder = False  # the foundation is only queried

    def start_from_foundation(self, network):
        frozen = network.foundation  # loaded when the network was built
        self.print_to_log_file(f"Black box: {frozen.num_parameters():,} foundation parameters queried, never "
                               f"trained; features: {self.features}")
        return [(frozen.head.weight, frozen.head.bias)]

    def new_heads(self, network):
        return [network.adapter.head]

    # --- cached features ---------------------------------------------------------------------

    def get_tr_and_val_datasets(self):
        dataset_tr, dataset_val = super().get_tr_and_val_datasets()
        if self.features == "cached":
            self.store = self._cache(dataset_tr.identifiers, lambda k: dataset_tr.load_case(k)[0], "support",
                                     self._cache_folder("feature_cache"))
            dataset_tr = FeatureDataset(dataset_tr, self.store)
        return dataset_tr, dataset_val

    def _cache_folder(self, name: str) -> str:
        # one per GPU process under DDP: every rank writes, reads and removes its own
        return os.path.join(self.output_folder, f"{name}_rank{self.local_rank}" if self.is_ddp else name)

    def _cache(self, keys, load, what: str, folder: str, pool: bool = False) -> FeatureStore:
        """Computes the features of every volume (average-pooled by POOL per axis if `pool`), after
        reporting how large they will be."""
        frozen = unwrap(self.network).foundation
        images = {k: load(k) for k in keys}
        store = FeatureStore(folder if self.feature_store == "disk" else "")
        shapes = [tuple(-(-n // POOL) if pool else n for n in np.shape(v)[1:]) for v in images.values()]
        self.print_to_log_file(f"Caching the features of {len(keys)} {what} volumes: {frozen.channels} channels"
                               f"{f', pooled by {POOL} per axis' if pool else ''}, {_megabytes(cache_bytes(frozen.channels, shapes))}"
                               f" fp16 {'in ' + folder if store.folder else 'in memory'}")
        for k, image in images.items():
            features = sliding_window_features(frozen, frozen.channels, torch.from_numpy(np.asarray(image[:])),
                                               self.configuration_manager.patch_size, self.device)
            store.put(k, pooled(features) if pool else features)
        return store

    # --- cached features: what lies outside the volume --------------------------------------------
    # nnU-Net pads a patch that reaches past the volume with image 0 and label -1, and trains that
    # padding as background. An image network sees the foundation's features of that padding, as at
    # inference; the cache holds the volume's features alone, so the padding here is a feature vector
    # of 0s, which the foundation never produces. Nothing outside the volume is scored, so it is left
    # out of the loss: on the synthetic benchmark (patches mostly padding) the linear probe's train
    # loss, which the early stop reads, started at -0.08 with it and -0.85 without, for the same
    # held-out Dice (0.870 / 0.796 vs 0.866 / 0.791 on two support scans).

    def _outside_label(self) -> Optional[int]:
        """The label of voxels outside the volume in cached-feature patches: the dataset's ignore
        label, or -1, which the loss then ignores; None for regions (left as nnU-Net labels them)."""
        if self.label_manager.has_regions:
            return None
        return self.label_manager.ignore_label if self.label_manager.has_ignore_label else -1

    def _build_loss(self):
        loss = super()._build_loss()
        # PartialLabelLoss (partially annotated scans) always leaves -1 out
        if self.features == "cached" and self._outside_label() == -1 and self.annotations is None:
            inner = getattr(loss, "loss", loss)  # inside nnU-Net's deep-supervision wrapper, if any
            inner.ignore_label = -1
            inner.ce.ignore_index = -1
        return loss

    def get_training_transforms(self, *args, **kwargs):
        transforms = super().get_training_transforms(*args, **kwargs)
        return spatial_only(transforms, self._outside_label()) if self.features == "cached" else transforms

    def _use_features(self, on: bool):
        unwrap(self.network).takes_features = on and self.features == "cached"

    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        self._use_features(True)

    def on_validation_epoch_start(self):
        super().on_validation_epoch_start()
        self._use_features(False)  # validation, and the final validation, run on images

    def on_train_end(self):
        self._use_features(False)
        super().on_train_end()
        for store in (self.store, self.query_store):
            if store is not None:
                store.clear()

    # --- transductive inference --------------------------------------------------------------

    def on_train_start(self):
        if self.transductive:  # checked before the features are cached and training starts
            self.query_files = query_images(self.plans_manager.dataset_name, self.dataset_json["file_ending"])
        super().on_train_start()
        if self.transductive:
            self._start_transductive()

    def _start_transductive(self):
        voxel_volume = float(np.prod(self.configuration_manager.spacing))
        tr_keys, _ = self.do_split()
        dataset = self.dataset_class(self.preprocessed_dataset_folder, tr_keys)
        segs = [np.asarray(dataset.load_case(k)[1][:])[0] for k in tr_keys]
        classes = self.label_manager.num_segmentation_heads
        prior = size_prior(support_volumes(segs, classes, voxel_volume))
        names = {v: n for n, v in plain_labels(self.dataset_json["labels"]).items()}
        self.print_to_log_file("Size prior (mm^3, from %d support volumes): %s" % (len(segs), ", ".join(
            f"{names.get(c + 1, c + 1)} {s:,.0f}" for c, s in enumerate(prior))))
        preprocessor = self.configuration_manager.preprocessor_class(verbose=False)
        images = {f"query_{i}": preprocessor.run_case(files, None, self.plans_manager, self.configuration_manager,
                                                      self.dataset_json)[0] for i, files in enumerate(self.query_files)}
        store = self._cache(list(images), images.get, "query", self._cache_folder("feature_cache_query"), pool=True)
        self.query_store = store
        self.size_prior = SizePrior([store.get(k) for k in images], prior, voxel_volume, self.size_margin,
                                    self.size_weight)

    def on_train_epoch_end(self, train_outputs):
        super().on_train_epoch_end(train_outputs)
        steps_done = (self.current_epoch + 1) * self.num_iterations_per_epoch
        if self.size_prior is not None and steps_done >= self.schedule.warmup_steps:
            hinge = self.size_prior.step(unwrap(self.network).adapter, self.optimizer)
            self.print_to_log_file(f"size hinge on query volumes (mean, before its step): {hinge:.4f}")
