# A second generated text for the fine-tuning tests, unlike demo_corpus.cmake's (another
# language's words): ${WORK_DIR}/target.
file(MAKE_DIRECTORY ${WORK_DIR}/target)
set(text "")
foreach(i RANGE 1 2500)
  math(EXPR a "${i} % 5")
  math(EXPR b "${i} % 11")
  string(APPEND text "Dicho ${i}: los ${a} zorros veloces saltan sobre ${b} perros perezosos, y a nadie le importa.\n%\n")
endforeach()
file(WRITE ${WORK_DIR}/target/muestra "${text}")
