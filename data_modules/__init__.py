"""MVTec AD 2 data: sample listing, datasets, GPU tiling and cut-paste, synthetic trees."""
