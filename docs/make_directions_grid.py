"""docs/face_s_directions.png: the embedded model in its other directions, 3x upscale.

Row 1: six held-out face-world renders after the image tokenizer's round trip (the tokens the model reads and keeps);
row 2: the same faces with their hair re-drawn under a prompt naming another hair colour (``Pipeline.edit``, region
"hair"); row 3: six caption-face pairs drawn together (``Pipeline.generate_pairs``). The captions (of the renders,
by masked diffusion and autoregressively, and of the pairs) go to docs/face_s_directions.md.
"""
from PIL import Image

import fastface
from fastface.data.dataset import make_dataset
from fastface.grid import image_grid

EDITS = ["blue", "red", "green", "white", "purple", "blonde"]


def main():
    pipe = fastface.load()
    faces = make_dataset(6, seed=10_001, captions=False)
    renders = [Image.fromarray(a) for a in faces["images"]]
    prompts = [f"a {a.gender} with {a.hair_style if a.hair_style in ('short', 'long', 'curly') else 'short'} "
               f"{colour} hair" for a, colour in zip(faces["attrs"], EDITS)]
    edited = pipe.edit(renders, prompts, "hair", seed=0)
    captions, pairs = pipe.generate_pairs(6, seed=0)
    diffusion = pipe.describe(renders, seed=0)
    autoregressive = pipe.describe(renders, mode="autoregressive")
    round_trip = pipe.decode_images(pipe.encode_images(renders))
    tiles = [img.resize((192, 192), Image.NEAREST) for img in [*round_trip, *edited, *pairs]]
    image_grid(tiles, columns=6).save("docs/face_s_directions.png")
    with open("docs/face_s_directions.md", "w") as f:
        f.write("# `docs/face_s_directions.png`: describe, edit, draw pairs\n\n")
        f.write("Made by `python docs/make_directions_grid.py` (seed 0, 16 steps). Columns 1-6, row by row.\n\n")
        f.write("## Row 1: held-out renders (tokenizer round trip), captioned from the renders\n\n")
        for i, (d, a) in enumerate(zip(diffusion, autoregressive)):
            f.write(f"{i + 1}. masked diffusion: {d}\n   autoregressive: {a}\n")
        f.write("\n## Row 2: hair re-drawn (every token outside the hair kept)\n\n")
        for i, p in enumerate(prompts):
            f.write(f"{i + 1}. {p}\n")
        f.write("\n## Row 3: caption and face drawn together\n\n")
        for i, c in enumerate(captions):
            f.write(f"{i + 1}. {c}\n")


if __name__ == "__main__":
    main()
