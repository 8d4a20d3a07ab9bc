"""The names of the files a model repository holds, the same for a hand-made Triton repository,
a published release and an installed version directory:

    <repository>/<model>/CONFIG_FILE          the model's configuration (Triton's config.pbtxt)
    <repository>/<model>/WARMUP_DIR/...       model_warmup input files
    <repository>/<model>/<version>/MODEL_FILE the graph (Triton's default_model_filename)
    <repository>/<model>/<version>/GOLDEN_FILE  inputs and expected outputs checked at load
    <repository>/<model>/<version>/VARIANT_FILE the variant a synced version holds (fp32, int8...)
"""

CONFIG_FILE = "config.pbtxt"
MODEL_FILE = "model.onnx"
WARMUP_DIR = "warmup"
GOLDEN_FILE = "golden.npz"
VARIANT_FILE = "variant"  # written by the agent, never published
