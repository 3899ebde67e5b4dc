"""Looking at images: products cut out (`segmentation`: Segment Anything or the border-colour
segmenter), shots scored (`scoring`: CLIP-I, CLIP-T, DINO and their masked variants; their names and
ranking, without the models, in `metrics`), the paper's DreamBench protocol (`evaluation`), and contact
sheets for people (`contact_sheet`).

May import `dreamcache.core`; nothing above it.
"""
