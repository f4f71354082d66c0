# velora_find_blas(<required>): finds an optimised BLAS with CMake's FindBLAS (honouring
# BLA_VENDOR: OpenBLAS, FLAME (BLIS), Intel10_64lp_seq, ...) plus the CBLAS header that matches
# it, and defines the imported target velora::cblas (BLAS::BLAS, the header's folder, and the
# definitions VELORA_WITH_BLAS and VELORA_BLAS_NAME). Sets velora_BLAS_FOUND.
#
# Used by the project's CMakeLists and by the installed veloraConfig.cmake, so that a consumer
# links the same kind of BLAS the package was configured with.
function(velora_find_blas required)
  set(velora_BLAS_FOUND FALSE PARENT_SCOPE)
  if(TARGET velora::cblas)
    set(velora_BLAS_FOUND TRUE PARENT_SCOPE)
    return()
  endif()
  if(required)
    find_package(BLAS REQUIRED)
  else()
    find_package(BLAS QUIET)
  endif()
  if(NOT BLAS_FOUND)
    return()
  endif()
  # The header beside the library: Debian keeps one cblas.h per BLAS variant in a folder named
  # like the library's (e.g. lib/x86_64-linux-gnu/openblas-openmp/ and
  # include/x86_64-linux-gnu/openblas-openmp/).
  list(GET BLAS_LIBRARIES 0 first_library)
  get_filename_component(first_library "${first_library}" REALPATH)   # through Debian's alternatives links
  get_filename_component(library_dir "${first_library}" DIRECTORY)
  get_filename_component(variant "${library_dir}" NAME)
  get_filename_component(library_name "${first_library}" NAME)
  get_filename_component(prefix "${library_dir}" DIRECTORY)
  find_path(VELORA_CBLAS_INCLUDE_DIR cblas.h
    HINTS "${prefix}/../include" "${prefix}/include" "${library_dir}/../include"
    PATH_SUFFIXES "${CMAKE_LIBRARY_ARCHITECTURE}/${variant}" "${variant}" openblas blis mkl ""
    DOC "Folder of the cblas.h that matches the BLAS library")
  if(NOT VELORA_CBLAS_INCLUDE_DIR)
    if(required)
      message(FATAL_ERROR "velora: found the BLAS library ${first_library} but no cblas.h; set VELORA_CBLAS_INCLUDE_DIR")
    endif()
    message(STATUS "velora: found the BLAS library ${first_library} but no cblas.h; the CPU GEMM uses Eigen")
    return()
  endif()
  if(variant MATCHES "pthread")
    message(WARNING "velora: ${first_library} is a pthreads build; the CPU backend calls the BLAS from its own OpenMP "
                    "threads, so run with OPENBLAS_NUM_THREADS=1 (or use the OpenMP build) to avoid oversubscription")
  endif()
  add_library(velora::cblas INTERFACE IMPORTED GLOBAL)
  set_target_properties(velora::cblas PROPERTIES
    INTERFACE_INCLUDE_DIRECTORIES "${VELORA_CBLAS_INCLUDE_DIR}"
    INTERFACE_LINK_LIBRARIES BLAS::BLAS
    INTERFACE_COMPILE_DEFINITIONS "VELORA_WITH_BLAS=1;VELORA_BLAS_NAME=\"${variant}/${library_name}\"")
  # OpenBLAS computes each element of C the same way in any sub-product the CPU backend cuts
  # (checked by tests/test_determinism.cpp), so the backend may cut by the thread count.
  if(library_name MATCHES "openblas")
    set_property(TARGET velora::cblas APPEND PROPERTY INTERFACE_COMPILE_DEFINITIONS VELORA_BLAS_SPLIT_SAFE=1)
  endif()
  message(STATUS "velora: CPU GEMM through ${first_library} (cblas.h in ${VELORA_CBLAS_INCLUDE_DIR})")
  set(velora_BLAS_FOUND TRUE PARENT_SCOPE)
endfunction()
