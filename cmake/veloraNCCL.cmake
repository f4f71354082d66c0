# NCCL for the CUDA backend's communicator (cuda/include/velora/cuda/nccl.hpp).
#
# velora_find_nccl(<required>): finds nccl.h and libnccl, looking first beside the CUDA toolkit
# (CUDAToolkit_INCLUDE_DIRS / CUDAToolkit_LIBRARY_DIR: some toolkits ship NCCL), then under
# NCCL_ROOT (CMake variable or environment) and the default paths (Debian: libnccl-dev). Defines
# the imported target velora::nccl_library and sets velora_NCCL_FOUND. Override with
# VELORA_NCCL_INCLUDE_DIR / VELORA_NCCL_LIBRARY. Call it after find_package(CUDAToolkit).
#
# velora_add_cuda_nccl(): the INTERFACE target velora_cuda_nccl (velora::cuda_nccl, exported as
# cuda_nccl): velora::cuda plus NCCL.
#
# Used by the project's CMakeLists and, for velora_find_nccl, by the installed
# veloraConfig.cmake (component nccl), so that a consumer finds NCCL the same way.
function(velora_find_nccl required)
  set(velora_NCCL_FOUND FALSE PARENT_SCOPE)
  if(TARGET velora::nccl_library)
    set(velora_NCCL_FOUND TRUE PARENT_SCOPE)
    return()
  endif()
  find_path(VELORA_NCCL_INCLUDE_DIR nccl.h
    HINTS ${CUDAToolkit_INCLUDE_DIRS} ${NCCL_ROOT} $ENV{NCCL_ROOT}
    PATH_SUFFIXES include
    DOC "Folder of nccl.h")
  find_library(VELORA_NCCL_LIBRARY nccl
    HINTS ${CUDAToolkit_LIBRARY_DIR} ${NCCL_ROOT} $ENV{NCCL_ROOT}
    PATH_SUFFIXES lib64 lib
    DOC "The NCCL library (libnccl)")
  if(NOT VELORA_NCCL_INCLUDE_DIR OR NOT VELORA_NCCL_LIBRARY)
    if(required)
      message(FATAL_ERROR "velora: NCCL not found (nccl.h: ${VELORA_NCCL_INCLUDE_DIR}, libnccl: ${VELORA_NCCL_LIBRARY}); "
                          "set NCCL_ROOT or VELORA_NCCL_INCLUDE_DIR and VELORA_NCCL_LIBRARY (Debian: apt-get install libnccl-dev)")
    endif()
    return()
  endif()
  add_library(velora::nccl_library UNKNOWN IMPORTED GLOBAL)
  set_target_properties(velora::nccl_library PROPERTIES
    IMPORTED_LOCATION "${VELORA_NCCL_LIBRARY}"
    INTERFACE_INCLUDE_DIRECTORIES "${VELORA_NCCL_INCLUDE_DIR}")
  message(STATUS "velora: NCCL ${VELORA_NCCL_LIBRARY} (nccl.h in ${VELORA_NCCL_INCLUDE_DIR})")
  set(velora_NCCL_FOUND TRUE PARENT_SCOPE)
endfunction()

function(velora_add_cuda_nccl)
  velora_find_nccl(TRUE)
  add_library(velora_cuda_nccl INTERFACE)
  add_library(velora::cuda_nccl ALIAS velora_cuda_nccl)
  set_target_properties(velora_cuda_nccl PROPERTIES EXPORT_NAME cuda_nccl)
  target_link_libraries(velora_cuda_nccl INTERFACE velora::cuda velora::nccl_library)
endfunction()
