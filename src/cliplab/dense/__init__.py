"""Open-vocabulary semantic segmentation from CLIP's patch tokens: dense methods registered by name.

``registry.py`` registers the methods (``@register_dense``) with what they need; ``base.py`` says what a method is
and what it is given; ``inference.py`` runs any method over an image of any size (aspect-kept resize, sliding
windows averaged per patch, bilinear upsampling in row strips, background threshold) with bounded memory.
"""
