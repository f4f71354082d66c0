# Runs EXE when it was built (the CUDA consumer exists only when velora::cuda was installed).
if(EXISTS ${EXE})
  execute_process(COMMAND ${EXE} RESULT_VARIABLE rc)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "${EXE} failed (${rc})")
  endif()
else()
  message(STATUS "no ${EXE}: velora was installed without the CUDA backend")
endif()
