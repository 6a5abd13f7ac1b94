//! SVA operator: reconciles `MirroredVolume` and `Plex` custom resources into sva-node pods
//! (DESIGN.md §8). Skeleton; the operator issue fills it in.
