# The demo's results are the same bits from run to run and at any OpenMP thread count: three
# runs of lm_train (2 threads twice, 1 thread once) with refreshes and rank changes must write
# the same JSON once the measured fields (time per step, tokens/s, peak RSS) are taken out, and
# the settings the runs differ in (OpenMP threads, --json path).
include(${CMAKE_CURRENT_LIST_DIR}/demo_corpus.cmake)
set(flags --corpus ${WORK_DIR}/corpus --steps 120 --eval-every 40 --batch 4 --context 32 --d-model 32 --heads 2 --ffn 64 --rank 8
          --groups 8 --configs adamw,galore,velora,adarank:xi=0.3,velora+adarank:xi=0.3)   # ξ = 0.3: ranks change in 120 steps
set(previous "")
foreach(run IN ITEMS 2a 1 2b)
  string(SUBSTRING ${run} 0 1 threads)
  execute_process(COMMAND ${CMAKE_COMMAND} -E env OMP_NUM_THREADS=${threads} ${TRAINER} ${flags} --json ${WORK_DIR}/${run}.json
                  RESULT_VARIABLE rc OUTPUT_QUIET ERROR_VARIABLE err)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "lm_train (OMP_NUM_THREADS=${threads}) failed (${rc}): ${err}")
  endif()
  file(READ ${WORK_DIR}/${run}.json json)
  string(REGEX REPLACE "\"(peak_rss_bytes|mean_step_ms|tokens_per_second)\":[^,}]*" "\"\\1\":measured" json "${json}")
  # and the settings that differ between the runs by design: the thread count and the --json path
  string(REGEX REPLACE "\"threads\":[0-9]+" "\"threads\":differs" json "${json}")
  string(REGEX REPLACE "\"json\":\"[^\"]*\"" "\"json\":differs" json "${json}")
  if(previous STREQUAL "")
    set(previous "${json}")
    set(first ${run})
  elseif(NOT json STREQUAL previous)
    message(FATAL_ERROR "lm_train wrote different results in run ${run} (OMP_NUM_THREADS=${threads}) than in run ${first}:\n${json}\nvs\n${previous}")
  endif()
endforeach()
message("3 runs (OMP_NUM_THREADS=2, 1, 2): identical results")
