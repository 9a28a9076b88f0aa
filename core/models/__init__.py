"""The face model and everything that builds one.

    coeffs         the coefficient layout (id | exp | tex | angles | gamma | trans): the one
                   place that splits a coefficient vector
    geometry       Euler rotations, vertex normals, spherical-harmonics lighting (pure functions)
    face_model     FaceModel: the linear model as an nn.Module with buffers (SPEC §2)
    bfm09          the converted BFM09 file, loaded strictly; model_from_arrays
    sfm, bfm2017   the Surrey Face Model and the Basel Face Model 2017/2019
    landmark_maps  iBUG-68 landmark vertices and contour definitions of a model
    synthetic      small smooth random models for tests and benchmarks
    registry       the models the scripts know by name (--recon_model) and how to load them
    convert_bfm09  the one-off conversion of the downloaded BFM09 files (convert_bfm09_data.py),
                   a package: mat, layout, inputs, index_files, conversion
"""
