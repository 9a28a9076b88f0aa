"""core: a differentiable 3D Morphable Face Model fitting library in PyTorch.

Modules (one job each):
    errors      UserError: the one-line errors the scripts print
    atomic      write files under a temporary name, then rename
    coeffs      the coefficient layout (id | exp | tex | angles | gamma | trans)
    camera      the pinhole camera of SPEC §3 and the pixel convention
    geometry    rotations, normals, spherical-harmonics lighting
    model       the face model (nn.Module with buffers)
    render      differentiable rasterizer (builtin, pure PyTorch) and pytorch3d backend
    losses      landmark, photometric, reflectance and regularisation losses
    detect      face and 68-landmark detection (face-alignment FAN, dlib)
    crop        square face box, crop/resize and paste back
    fitting     the rigid and non-rigid fitting stages
"""
