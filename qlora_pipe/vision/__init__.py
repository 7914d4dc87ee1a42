"""Vision-language models (task: vision): images in the rows, the language model in 4-bit, the vision parts in
16 bits. The modules sit in the layers of the stages they serve (tests/test_architecture.py's LAYERS):

images.py    an image reference (path, URL, base64, bytes) -> its checked bytes          (data)
rows.py      chat rows with image parts, or <image> placeholders and an images column    (data)
encode.py    one row -> ids, labels proven against the processor's expansion, images    (data)
data.py      the data stage of a vision run: read, checked, split, encoded, reported     (data)
collate.py   batches: padded ids and labels, the image processor's pixel values          (data)
model.py     the model's parts, its 4-bit load, LoRA targets, the processor, reloads     (models)
builder.py   a SmolVLM-shaped model from a real language model, built offline            (models)
answers.py   held-out image questions answered and scored against the baseline           (evaluate)
The method (qlora_pipe/methods/vision.py) composes them.
"""
