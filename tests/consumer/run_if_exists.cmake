# Runs EXE when it was built (the CUDA, MPI and torch consumers exist only when velora::cuda,
# velora::mpi or velora::torch was installed).
if(EXISTS ${EXE})
  execute_process(COMMAND ${EXE} RESULT_VARIABLE rc)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "${EXE} failed (${rc})")
  endif()
else()
  message(STATUS "no ${EXE}: velora was installed without that component")
endif()
