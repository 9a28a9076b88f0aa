"""The one-off conversion of the downloaded Basel Face Model 2009 files into the converted
model file (SPEC §1), run by ``convert_bfm09_data.py``.

    mat          recognising a download by its first bytes; reading MATLAB .mat files
    layout       the converted file: keys, shapes, units, and the check of a converted model
    inputs       01_MorphableModel.mat, Exp_Pca.bin and BFM_model_front.mat
    index_files  the four index files from Deep3DFaceReconstruction, read or downloaded
    conversion   the conversion itself, the output checks and the atomic write
"""
from .conversion import check_output, check_output_space, convert, convert_folder
from .index_files import INDEX_FILES, INDEX_SHA256, download_index_files, read_index_files
from .inputs import BASEL_FILE, EXP_PCA_FILE, FRONT_MAT_FILE, read_basel, read_exp_pca
from .layout import OUT_FILE

__all__ = [
    "BASEL_FILE", "EXP_PCA_FILE", "FRONT_MAT_FILE", "INDEX_FILES", "INDEX_SHA256", "OUT_FILE",
    "check_output", "check_output_space", "convert", "convert_folder", "download_index_files",
    "read_basel", "read_exp_pca", "read_index_files",
]
