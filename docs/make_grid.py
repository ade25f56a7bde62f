"""docs/face_s_grid.png: 16 prompts drawn by the embedded model (seed 0, default steps and guidance), 3x upscale,
each tile captioned by its prompt number; the prompts go to docs/face_s_grid.md."""
from PIL import Image, ImageDraw

import fastface
from fastface.grid import image_grid

PROMPTS = [
    "an old man with a grey beard, round glasses and blue eyes",
    "a smiling woman with long red hair and green eyes",
    "a young man with short black hair and a red cap",
    "a woman with blonde hair, red lipstick and hoop earrings",
    "a bald man with a brown beard and square glasses",
    "a young woman with curly brown hair and blue eye shadow",
    "a man with sunglasses and a moustache",
    "an old woman with white hair and round glasses",
    "a woman with a bun, a green shirt and a blue background",
    "a frowning man with a round face and grey hair",
    "a young woman with a bob, brown eyes and blush",
    "a man with a black beanie, a goatee and a yellow background",
    "a smiling woman with dark skin, black hair and purple lipstick",
    "a young man with blonde hair, a buzz cut and an open mouth",
    "a woman with pink lipstick, long black hair and a red background",
    "an old man with stubble, a blue top hat and green eyes",
]

def main():
    pipe = fastface.load()
    images = pipe.generate(PROMPTS, seed=0)
    tiles = []
    for i, img in enumerate(images):
        big = img.resize((192, 192), Image.NEAREST)
        ImageDraw.Draw(big).text((4, 2), str(i + 1), fill=(0, 0, 0))
        tiles.append(big)
    image_grid(tiles, columns=4).save("docs/face_s_grid.png")
    with open("docs/face_s_grid.md", "w") as f:
        f.write("# `docs/face_s_grid.png`: the embedded face-s model, 16 prompts\n\n")
        f.write("Drawn by `python docs/make_grid.py` (seed 0, 16 steps, guidance 2.0; tiles numbered row by row):\n\n")
        for i, p in enumerate(PROMPTS):
            f.write(f"{i + 1}. {p}\n")
    print("wrote docs/face_s_grid.png")


if __name__ == "__main__":
    main()
