"""Prompt templates for the text side of zero-shot segmentation (design.md §7.1)."""

# The 80 prompts OpenAI used for zero-shot ImageNet with CLIP.
FULL_IMAGENET_TEMPLATES = [
    'a bad photo of a {}.', 'a photo of many {}.', 'a sculpture of a {}.', 'a photo of the hard to see {}.',
    'a low resolution photo of the {}.', 'a rendering of a {}.', 'graffiti of a {}.', 'a bad photo of the {}.',
    'a cropped photo of the {}.', 'a tattoo of a {}.', 'the embroidered {}.', 'a photo of a hard to see {}.',
    'a bright photo of a {}.', 'a photo of a clean {}.', 'a photo of a dirty {}.', 'a dark photo of the {}.',
    'a drawing of a {}.', 'a photo of my {}.', 'the plastic {}.', 'a photo of the cool {}.',
    'a close-up photo of a {}.', 'a black and white photo of the {}.', 'a painting of the {}.',
    'a painting of a {}.', 'a pixelated photo of the {}.', 'a sculpture of the {}.', 'a bright photo of the {}.',
    'a cropped photo of a {}.', 'a plastic {}.', 'a photo of the dirty {}.', 'a jpeg corrupted photo of a {}.',
    'a blurry photo of the {}.', 'a photo of the {}.', 'a good photo of the {}.', 'a rendering of the {}.',
    'a {} in a video game.', 'a photo of one {}.', 'a doodle of a {}.', 'a close-up photo of the {}.',
    'a photo of a {}.', 'the origami {}.', 'the {} in a video game.', 'a sketch of a {}.', 'a doodle of the {}.',
    'a origami {}.', 'a low resolution photo of a {}.', 'the toy {}.', 'a rendition of the {}.',
    'a photo of the clean {}.', 'a photo of a large {}.', 'a rendition of a {}.', 'a photo of a nice {}.',
    'a photo of a weird {}.', 'a blurry photo of a {}.', 'a cartoon {}.', 'art of a {}.', 'a sketch of the {}.',
    'a embroidered {}.', 'a pixelated photo of a {}.', 'itap of the {}.', 'a jpeg corrupted photo of the {}.',
    'a good photo of a {}.', 'a plushie {}.', 'a photo of the nice {}.', 'a photo of the small {}.',
    'a photo of the weird {}.', 'the cartoon {}.', 'art of the {}.', 'a drawing of the {}.',
    'a photo of the large {}.', 'a black and white photo of a {}.', 'the plushie {}.', 'a dark photo of a {}.',
    'itap of a {}.', 'graffiti of the {}.', 'a toy {}.', 'itap of my {}.', 'a photo of a cool {}.',
    'a photo of a small {}.', 'a tattoo of the {}.',
]

# The 7-prompt subset OpenAI found best on ImageNet ("sub-ImageNet" ensemble).
SUBSET_IMAGENET_TEMPLATES = [
    'itap of a {}.', 'a bad photo of the {}.', 'a origami {}.', 'a photo of the large {}.', 'a {} in a video game.',
    'art of the {}.', 'a photo of the small {}.',
]

TEMPLATES = {
    'simple': ['a photo of a {}.'],
    'subset': SUBSET_IMAGENET_TEMPLATES,
    'full': FULL_IMAGENET_TEMPLATES,
    'identity': ['{}'],
}


def get_templates(name_or_list):
    """A template-set name (``simple``/``subset``/``full``/``identity``) or an explicit list -> list of formats."""
    if isinstance(name_or_list, str):
        if name_or_list not in TEMPLATES:
            raise ValueError(f"unknown template set {name_or_list!r}; choose one of {sorted(TEMPLATES)}")
        return list(TEMPLATES[name_or_list])
    templates = list(name_or_list)
    if not templates or any('{}' not in t for t in templates):
        raise ValueError("every template must contain '{}' (the class-name slot)")
    return templates
