"""Stand-in for modules/processing.py: the p / processed objects and process_images' hook order.

Per batch, each image goes through postprocess_image and only then gets its infotext (from
p.extra_generation_params at that moment) and is saved; a grid is inserted at index 0 with
index_of_first_image = 1; postprocess(p, processed) runs last.
"""

from . import scripts


class StableDiffusionProcessing:
    def __init__(self, prompt, seed, batch_size=1, n_iter=1, negative_prompt=""):
        self.prompt = prompt
        self.negative_prompt = negative_prompt
        self.seed = seed
        self.batch_size = batch_size
        self.n_iter = n_iter
        self.iteration = 0
        self.all_prompts = [prompt] * (batch_size * n_iter)
        self.all_seeds = [seed + i for i in range(batch_size * n_iter)]
        self.extra_generation_params = {}
        self.comments = {}
        self.scripts = None
        self.script_args = []

    def comment(self, text):
        self.comments[text] = 1


class Processed:
    def __init__(self, p, images, infotexts, index_of_first_image=0):
        self.images = images
        self.infotexts = infotexts
        self.index_of_first_image = index_of_first_image
        self.all_prompts = p.all_prompts
        self.all_seeds = p.all_seeds
        self.comments = "".join(f"{c}\n" for c in p.comments)


def create_infotext(p, index):
    params = ", ".join(f"{k}: {v}" for k, v in p.extra_generation_params.items() if v is not None)
    return f"{p.all_prompts[index]}\nSeed: {p.all_seeds[index]}" + (f", {params}" if params else "")


def process_images(p, sample, make_grid=None):
    """``sample(prompts, seeds) -> list[PIL]`` plays the model; ``make_grid(images) -> PIL`` the grid."""
    p.scripts.process(p)
    images, infotexts = [], []
    for n in range(p.n_iter):
        p.iteration = n
        batch = slice(n * p.batch_size, (n + 1) * p.batch_size)
        for i, image in enumerate(sample(p.all_prompts[batch], p.all_seeds[batch])):
            index = i + n * p.batch_size
            if scripts.HOST == "forge":
                pp = scripts.PostprocessImageArgs(image, index)
            else:
                pp = scripts.A1111PostprocessImageArgs(image)
            p.scripts.postprocess_image(p, pp)
            infotexts.append(create_infotext(p, index))
            images.append(pp.image)
    first = 0
    if make_grid is not None and len(images) > 1:
        images.insert(0, make_grid(images))
        infotexts.insert(0, create_infotext(p, 0))
        first = 1
    processed = Processed(p, images, infotexts, first)
    p.scripts.postprocess(p, processed)
    return processed
