"""The support set held on the training device and nnU-Net's dataloaders around it
(`device_dataloaders`, what a trainer's get_dataloaders returns when gpu_data is on)."""
from typing import Dict, Optional

import numpy as np
import torch
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader

from nnunet_fseft.environment import GPU_DATA
from nnunet_fseft.errors import InputError
from nnunet_fseft.training.gpu_data.augmentation import DeviceAugmentation
from nnunet_fseft.training.gpu_data.spatial import crop_pad


class DeviceSupportLoader(nnUNetDataLoader):
    """nnU-Net's training loader with every case held on `device`: the same case and patch draws,
    the crop and the augmentation on the device. Returns the batch already there."""

    def __init__(self, dataset, batch_size, patch_size, final_patch_size, label_manager, device,
                 augmentation: DeviceAugmentation, **kwargs):
        super().__init__(dataset, batch_size, patch_size, final_patch_size, label_manager, **kwargs)
        self.augmentation = augmentation
        cases = [dataset.load_case(key) for key in dataset.identifiers]  # arrays stay on disk until read
        if any(seg_prev is not None for _, _, seg_prev, _ in cases):
            raise InputError("The GPU data path does not serve cascades (previous-stage segmentations); "
                             f"train with CPU augmentation: gpu_data = False or {GPU_DATA}=0.")
        self.nbytes = sum(int(np.prod(d.shape)) * 4 + int(np.prod(s.shape)) * 2 for d, s, _, _ in cases)
        too_big = support_too_big(self.nbytes, device)
        if too_big:
            raise InputError(f"The GPU data path cannot hold this support set: {too_big}; train with CPU "
                             f"augmentation: gpu_data = False or {GPU_DATA}=0.")
        self.cases: Dict[str, tuple] = {
            key: (torch.from_numpy(np.ascontiguousarray(data[:])).float().to(device),
                  torch.from_numpy(np.ascontiguousarray(seg[:])).to(torch.int16).to(device),
                  properties["class_locations"])
            for key, (data, seg, _, properties) in zip(dataset.identifiers, cases)}

    def generate_train_batch(self):
        keys = self.get_indices()
        images, segs = [], []
        for j, key in enumerate(keys):
            data, seg, class_locations = self.cases[key]
            lbs, _ = self.get_bbox(np.array(data.shape[1:]), self.get_do_oversample(j), class_locations)
            images.append(crop_pad(data, lbs, self.patch_size, 0.))
            segs.append(crop_pad(seg, lbs, self.patch_size, -1))
        image, seg = torch.stack(images), torch.stack(segs)
        if self.patch_size_was_2d:
            image, seg = image[:, :, 0], seg[:, :, 0]
        image, target = self.augmentation(image, seg)
        return {"data": image.contiguous(), "target": target, "keys": keys}


def support_too_big(nbytes: int, device: torch.device) -> Optional[str]:
    """Why the support set would not fit comfortably on the device, or None."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    if nbytes > 0.25 * free:
        return (f"the support set needs {nbytes / 2 ** 30:.2f} GiB, more than a quarter of the "
                f"{free / 2 ** 30:.2f} GiB free on {device}")
    return None


def device_dataloaders(trainer):
    """What nnUNetTrainer.get_dataloaders returns, with the training loader on the trainer's device:
    the same patch sizes, transform pipeline, oversampling and validation loader as nnU-Net's."""
    from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
    from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter
    from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA

    patch_size = trainer.configuration_manager.patch_size
    scales = trainer._get_deep_supervision_scales()
    rotation, dummy_2d, initial_patch_size, mirror_axes = \
        trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
    labels = trainer.label_manager
    regions = labels.foreground_regions if labels.has_regions else None
    pipeline = trainer.get_training_transforms(
        patch_size, rotation, scales, mirror_axes, dummy_2d,
        use_mask_for_norm=trainer.configuration_manager.use_mask_for_norm, is_cascaded=trainer.is_cascaded,
        foreground_labels=labels.foreground_labels, regions=regions, ignore_label=labels.ignore_label)
    augmentation = DeviceAugmentation(pipeline)
    val_transforms = trainer.get_validation_transforms(scales, is_cascaded=trainer.is_cascaded,
                                                       foreground_labels=labels.foreground_labels,
                                                       regions=regions, ignore_label=labels.ignore_label)
    dataset_tr, dataset_val = trainer.get_tr_and_val_datasets()
    oversampling = dict(oversample_foreground_percent=trainer.oversample_foreground_percent,
                        probabilistic_oversampling=trainer.probabilistic_oversampling)
    dl_tr = DeviceSupportLoader(dataset_tr, trainer.batch_size, initial_patch_size, patch_size, labels,
                                trainer.device, augmentation, **oversampling)
    trainer.print_to_log_file(f"GPU data path: {len(dl_tr.cases)} support cases held on {trainer.device} "
                              f"({dl_tr.nbytes / 2 ** 20:.1f} MB); patches cut and augmented there")
    dl_val = nnUNetDataLoader(dataset_val, trainer.batch_size, patch_size, patch_size, labels,
                              transforms=val_transforms, **oversampling)
    processes = get_allowed_n_proc_DA()
    train = SingleThreadedAugmenter(dl_tr, None)
    val = SingleThreadedAugmenter(dl_val, None) if processes == 0 else NonDetMultiThreadedAugmenter(
        data_loader=dl_val, transform=None, num_processes=max(1, processes // 2),
        num_cached=max(3, processes // 4), seeds=None, pin_memory=trainer.device.type == "cuda", wait_time=0.002)
    next(train)
    next(val)
    return train, val
