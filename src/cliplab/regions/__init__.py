"""Boxes below the image level: score user or ground-truth boxes against category and attribute prompts
(OvarNet's inference side, paper 9), BIRDet's image-conditioned background and partial-object suppression
(paper 19), and box accuracy on COCO annotations. cliplab never proposes boxes: they come from a file or from
ground truth."""
