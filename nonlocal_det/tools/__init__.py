"""The commands, each a thin layer over the library (``python -m nonlocal_det.tools.<name>``):

analyze         parameters and FLOPs of a config, with and without its blocks
visualize       what a block attends to on an image (the paper's Figure 3)
predict         a model's detections drawn on images or dataset samples
export          TorchScript (scripting, tracing) and ONNX, checked against eager
warm_start      check a warm start from a checkpoint without blocks
d2_tool         run one of Detectron2's own tools/ scripts on a YAML config
generate_data   write the demo dataset as plain COCO files
convert_mmdet   an mmdetection checkpoint (GC, generalized attention) as a Detectron2 one
"""
