"""Few-shot data path on the GPU: `gpu_data = True` on a trainer, or nnUNet_fseft_gpu_data=1.

With K <= 10 the preprocessed support set fits in GPU memory, so it is loaded onto the device
once, and patches are cut and augmented there, a batch at a time: training no longer waits on
CPU workers. What is sampled stays nnU-Net's:
- cases and patch locations: `nnUNetDataLoader`'s own `get_indices` and `get_bbox` (foreground
  oversampling included); only the crop runs on the device;
- augmentation: the pipeline the trainer's `get_training_transforms` builds is read transform
  by transform, and each is replaced by a batched device op that draws its parameters from that
  transform's own ranges and probabilities (batchgeneratorsv2's `sample_scalar` and numpy's
  global generator, as nnU-Net's workers do) and applies them with torch ops on the batch's device.
  batchgeneratorsv2's transforms themselves cannot run there: SpatialTransform builds its grid
  on the CPU and reads label values through numpy.
A transform without a device op (cascade, regions, elastic deformation...) is refused before
training starts. CPU augmentation stays the default and the fallback.

Modules: spatial.py and intensity.py (one device op per nnU-Net transform), augmentation.py (the
pipeline read transform by transform), loader.py (the support set on the device, the dataloaders).
"""
