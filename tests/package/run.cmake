# Installs moe from SOURCE_DIR into WORK_DIR/prefix, then configures, builds and runs the consumer
# project in tests/package/consumer against it with find_package(moe CONFIG REQUIRED), with the
# C++ compiler of the build that runs the test (CXX_COMPILER): g++ in one configuration, clang in another.
# WITH_CUDA (the build's MOE_ENABLE_CUDA): also build the consumer's nvcc program where nvcc is found.
file(REMOVE_RECURSE ${WORK_DIR})
function(run)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE result OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(NOT result EQUAL 0)
    message(FATAL_ERROR "package test: '${ARGN}' failed (${result}):\n${out}\n${err}")
  endif()
endfunction()
run(${CMAKE_COMMAND} -S ${SOURCE_DIR} -B ${WORK_DIR}/lib-build -G ${GENERATOR} -DCMAKE_CXX_COMPILER=${CXX_COMPILER}
    -DMOE_BUILD_TESTS=OFF -DMOE_BUILD_BENCH=OFF -DMOE_BUILD_EXAMPLES=OFF -DCMAKE_INSTALL_PREFIX=${WORK_DIR}/prefix)
run(${CMAKE_COMMAND} --install ${WORK_DIR}/lib-build)
run(${CMAKE_COMMAND} -S ${SOURCE_DIR}/tests/package/consumer -B ${WORK_DIR}/consumer-build -G ${GENERATOR}
    -DCMAKE_PREFIX_PATH=${WORK_DIR}/prefix -DCMAKE_BUILD_TYPE=Release -DCMAKE_CXX_COMPILER=${CXX_COMPILER}
    -DCONSUMER_WITH_CUDA=${WITH_CUDA})
run(${CMAKE_COMMAND} --build ${WORK_DIR}/consumer-build)
run(${WORK_DIR}/consumer-build/consumer)
message(STATUS "package test: installed, found with find_package(moe), built with ${CXX_COMPILER} (nvcc consumer: ${WITH_CUDA}) and ran the consumer")
